-- The stand's private-network key for a stand created at the relay, handed to each device it
-- enrols (a device-created stand keeps its key on its devices).
ALTER TABLE stands ADD COLUMN psk TEXT;
