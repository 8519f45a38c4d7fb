"""SAE feature deactivation at run time: the SAE, the intervention it is installed as, itd, saeuron."""
