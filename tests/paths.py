"""Where the repository and the tests' helper scripts are, for tests in any folder."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tests", "scripts")
