"""The running gateway: the request pipeline, the admin port, start/reload/stop, the embedded upstream, workers."""
