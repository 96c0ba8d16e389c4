"""Run pytest and treat "no tests collected" (exit 5) as a failure with a clear message.

CI must never pass on an empty run: a broken collection or an over-eager marker filter would
otherwise look green.
"""

import sys

import pytest

code = pytest.main(sys.argv[1:])
if code == pytest.ExitCode.NO_TESTS_COLLECTED:
    print("error: pytest collected no tests (exit 5); refusing to call that a pass", file=sys.stderr)
    sys.exit(1)
sys.exit(int(code))
