"""Wire codecs: protocol tensor messages ⇄ numpy arrays (no protocol logic beyond the tensors)."""
