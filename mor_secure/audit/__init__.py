"""Privacy audits: empirical epsilon lower bounds that check the DP training that ships."""
