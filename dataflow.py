"""The kwf engine from a checkout: ``python -m bytewax.run dataflow -r DIR -s 5 -b 0``.

The same engine as ``python -m bytewax.run kwf.engine:engine_flow`` (an installed kwf); see
``kwf.engine``.
"""

from kwf.engine import engine_flow

flow = engine_flow()
