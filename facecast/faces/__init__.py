"""Face analysis: detect → landmarks (mesh) → embed."""
