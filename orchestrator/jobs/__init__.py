"""Jobs on a Ray cluster: batch submission (Ray Jobs API), job records, deployments (Ray Serve)."""
