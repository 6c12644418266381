import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # task modules here must import by name in the driver and (via its sys.path) in replicas
    sys.path.insert(0, HERE)
