"""Find labelled images, decode, split, transform and batch them; the named datasets and the caches."""
