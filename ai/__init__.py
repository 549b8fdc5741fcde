"""Image analysis: normalisation, lung-field segmentation and classification (no networking, no database)."""
