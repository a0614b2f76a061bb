"""Red-team kit: test the sanitizer on your own encoder.

Trigger functions (uint8 pixels in, uint8 pixels out), backdoor implanters that return a victim encoder
with the attack's own success rate (the poisoning ones the clean encoder too), probes that measure it,
and loaders for the offline benchmark data.
"""

from sanitizer.redteam.triggers import TRIGGERS, badencoder_patch, blend, clip_patch, ctrl

__all__ = ["TRIGGERS", "badencoder_patch", "blend", "clip_patch", "ctrl"]
