"""`run_agent.py cluster`: engine replicas on Ray Serve (`launcher`, `replica`) behind one public
gateway (`gateway`); `bench` measures the gateway's relay."""
