"""VoiceFleet operator: reconciles VoiceAgent resources (`voicefleet.dev/v1alpha1`) into fleets of
LiveKit voice-agent workers. The API models live in `voicefleet_operator.api`."""
