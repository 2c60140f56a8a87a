"""Router implementations; each module registers its class."""
