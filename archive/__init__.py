"""What capture and replay share: the archive's table layout, its SQL and the AMQP message codec."""
