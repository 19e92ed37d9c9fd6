"""Scripts for the device machine (a GPU lent to some sessions): the kit they carry and what they run."""
