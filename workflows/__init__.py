"""Example workflows: each public module registers its workflows and declares its output topics.

``kwf.registry.load_modules(["workflows"])`` (the engine's default ``KWF_WORKFLOWS``) imports
every public submodule, so helpers that must not run in the engine (the demo services) live in
modules whose names start with ``_``.

- ``trip_booking``: the seed's trip-booking saga (``trip``): parallel reservations, a timeout,
  compensations.
- ``ecommerce``: the seed's shopping cart (``cart``): signals on a named channel, an
  abandonment timer with one reminder.
- ``order``: an order (``order``): payment, inventory, shipping through ``kwf.call`` with
  timeouts, retries and backoff; compensation in reverse order on failure.
- ``approval``: a human approval (``approval``) that waits days on durable timers, reminds,
  escalates, and ends on a decision signal or expiry.
"""
