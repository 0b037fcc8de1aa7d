"""Navigation simulator: procedural indoor worlds on MiniWorld, navigable grid, geodesic expert, VLN metrics.

MiniWorld renders through pyglet, which must be told it is headless before it is first imported;
the package does that here so no user or test has to (an explicit setting is respected).
"""

import os

os.environ.setdefault("PYGLET_HEADLESS", "true")
