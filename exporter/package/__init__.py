"""`qwen-edge package`: app bundles for Android, iOS and the web, and `package verify`."""
