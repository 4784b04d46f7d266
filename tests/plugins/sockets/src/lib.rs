//! An image source that opens a TCP socket itself: its component imports
//! wasi:sockets, which the host must refuse at load time.

use cocoon_plugin_sdk::image_source::*;

struct Sockets;

impl ImageSource for Sockets {
    fn schemes() -> Vec<String> {
        vec!["sockets".into()]
    }

    fn resolve(reference: &str, _platform: Platform) -> Result<Vec<Artifact>, Error> {
        let stream = std::net::TcpStream::connect(reference)
            .map_err(|e| Error::io(format!("connect {reference}: {e}")))?;
        Ok(vec![Artifact {
            url: format!("{:?}", stream.peer_addr()),
            digest: None,
            size: None,
            media_type: "text/plain".into(),
            format_hint: None,
            headers: Vec::new(),
        }])
    }
}

cocoon_plugin_sdk::export_image_source!(Sockets);
