"""DICOMweb: STOW-RS in (:mod:`.stow`) and out (:mod:`.client`), over streamed
multipart/related bodies (:mod:`.multipart`)."""
