//! The vmdk converter: the cocoon-format-vmdk parser, run over the host's
//! read-at source by the SDK's native-format adapter.

cocoon_plugin_sdk::export_format_converter!(
    cocoon_plugin_sdk::format_converter::native::Native<cocoon_format_vmdk::Vmdk>
);
