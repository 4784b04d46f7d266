//! An image source built against a plugin API version the host does not
//! know (0.3.0): refused, naming both versions.

wit_bindgen::generate!({
    world: "image-source",
    path: "wit",
});

struct FutureSource;

impl exports::cocoon::plugin::resolver::Guest for FutureSource {
    fn schemes() -> Vec<String> {
        vec!["future".into()]
    }
}

export!(FutureSource);
