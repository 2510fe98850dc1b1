"""Type errors mypy must find: the library's types are real, not Any."""

from charging.connection import connect
from charging.settings import Settings
from producer import Outcome, Producer


def charged(outcome: Outcome) -> str:
    return outcome.charged


def submitted(settings: Settings) -> None:
    count: int = Producer(connect(settings), settings).submit([])
    print(count)
