"""`charging chaos`: kill, stall and restart everything under load, then check that nothing
was lost and nothing charged twice."""
