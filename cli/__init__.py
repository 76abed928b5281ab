"""The programs' command lines: the flags of train.py, eval.py and reproduce.py, parsed and
checked here, above the library packages they configure."""
