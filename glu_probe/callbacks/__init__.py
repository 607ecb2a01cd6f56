"""Lightning callbacks: NTK spectrum, generalization gap and loss crossings."""
