"""DeDe backdoor-sample sanitizer."""
