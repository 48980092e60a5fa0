import os
import sys
from pathlib import Path

# moshi's lazy torch.compile costs 20+ s on the first step; tests run eager.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
