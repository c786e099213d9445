"""The DICOM C-STORE SCP: makes each instance durable, records it and queues it for triage."""
