"""Device-mapper: typed targets (table lines, status parsing) and the dmsetup adapter."""
