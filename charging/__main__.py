from charging.cli import main

main()
