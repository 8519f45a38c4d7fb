"""erase's core: what every method shares and none names. Concept specs and input checks, the method registry,
the artifact format and the payload kinds it holds. Nothing here imports torch on package import."""
