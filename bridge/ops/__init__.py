"""What the people on call read and what runs on its own: the translation log, housekeeping."""
