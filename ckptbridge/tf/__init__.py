"""Everything that needs TensorFlow.  Nothing here is imported by ``import ckptbridge``."""
