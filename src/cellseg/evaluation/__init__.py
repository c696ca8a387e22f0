"""The competition metric and the dry run that scores the kernel's path on train images."""
