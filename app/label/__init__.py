"""Labelling many images (a folder, a zip, a video's frames) with grounded phrases, as a dataset."""
