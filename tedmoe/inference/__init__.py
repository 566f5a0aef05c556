"""Using a trained model: loading a checkpoint of any layout and generating text."""
