"""`rotaq sweep`: many runs that share their common stages, and the table and Pareto plot that compare them."""
