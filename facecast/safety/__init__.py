"""Ethics as features: consent and moderation gates, the audit log, provenance marks (SEI, C2PA)."""
