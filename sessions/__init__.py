"""Session plumbing: relay, SFTP/SCP policy proxy, recording and replay."""
