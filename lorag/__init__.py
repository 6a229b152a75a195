"""The product's face: the ``lorag`` command and the demo."""
