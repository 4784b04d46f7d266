//! The conversion engine: probe, map through a converter plugin, copy data
//! extents, decode compressed ones in parallel, write a sparse raw file.
