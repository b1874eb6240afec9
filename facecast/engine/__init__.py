"""The engine: one swap per frame (SwapEngine), the file runners, stage timing."""
