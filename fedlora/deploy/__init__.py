"""What both deployment launchers share: process helpers (:mod:`.processes`)."""
