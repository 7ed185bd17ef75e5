"""fabric: the node agent (fabricd), its composition root and the fabricctl CLI."""
