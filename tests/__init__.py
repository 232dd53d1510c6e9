"""The test suite: shared fixtures in ``conftest.py``, shared helpers in ``helpers.py``."""
