"""Record schemas, readers and slide geometry shared by every stage."""
