/** OHIF v3 (@ohif/app 3.13) configuration for Orthanc's DICOMweb, served as /app-config.js
 * by serve.py (the same origin as /dicom-web and /wado, which it proxies to Orthanc).
 * Field choices follow the Orthanc OHIF plugin's app-config-system.js and OHIF's DICOMweb
 * data source documentation; checked against orthanc-dicomweb 1.7 (Debian 12).
 * Nothing here loads from outside the server: no CDN, no fonts, no analytics. */

// The onboarding tour would cover the first viewport on every new browser profile.
try {
  window.localStorage.setItem('shownTours', '["basicViewerTour"]');
} catch (e) {
  /* storage disabled: the tour shows once */
}

window.config = {
  name: 'dicomnode-orthanc',
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: true,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // The "investigational use" banner: the results say "not for clinical use" themselves.
  investigationalUseDialog: { option: 'never' },
  // SEG and Parametric Maps are drawn over their image when their series is opened,
  // without a "Load?" prompt.
  disableConfirmationPrompts: true,
  // 'standard' asks before turning an SR into editable measurements; the node's TID 1500
  // report is shown read-only in the SR viewport either way.
  measurementTrackingMode: 'simplified',
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: true,
        singlepart: 'bulkdata,video,pdf',
        acceptHeader: ['multipart/related; type=application/octet-stream; transfer-syntax=*'],
        // Orthanc writes absolute BulkDataURIs built from the request's Host header (when
        // its DicomWeb "Host" option is unset, see deploy/orthanc/dicomweb.json): serve.py
        // passes the browser's Host on, so they point at serve.py too.
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
  // Keyboard shortcuts and hotkeys are OHIF's defaults.
};
