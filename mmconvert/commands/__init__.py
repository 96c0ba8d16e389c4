"""The click commands: options, printing and exit codes over :mod:`mmconvert.api`."""
