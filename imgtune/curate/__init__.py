"""Building your own dataset: download, doctor, the change log with undo, mislabel finder, the cleaner page."""
