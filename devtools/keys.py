"""The intake keys used against fake intakes (tests' FakeIntake, the bench intake).

Test values, never real ones: 32 alphanumeric characters, shaped like Sekoia's examples.
"""

from __future__ import annotations

#: The key the fake intakes accept; configure the daemon with it.
INTAKE_KEY = "FakeIntakeKey0123456789abcdefXYZ"
