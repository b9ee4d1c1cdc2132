"""Device meshes and the logical-axis rules that map model axis names onto them."""
